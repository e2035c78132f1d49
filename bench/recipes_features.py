"""Bench: head recipes on frozen MobileNet features (cached views), on the real snacks data.

Usage: python bench/recipes_features.py DATA_DIR WEIGHTS_DIR OUT_JSON [--size 224] [--aug-views 3]
Measures test/val accuracy (plain and flip TTA) of a GAP->Dropout->Dense(L2) head trained on
features of: original images; original+flipped; original+flipped+K book-augmented views.
"""
import json, os, sys, time
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np
from PIL import Image
import tf_keras as keras
from tf_keras.applications.mobilenet import preprocess_input
from tf_keras.preprocessing.image import ImageDataGenerator

data, weights, out = sys.argv[1], sys.argv[2], sys.argv[3]
size = int(sys.argv[sys.argv.index("--size") + 1]) if "--size" in sys.argv else 224
k_aug = int(sys.argv[sys.argv.index("--aug-views") + 1]) if "--aug-views" in sys.argv else 3
classes = sorted(os.listdir(os.path.join(data, "train")))

def load(split):
    xs, ys = [], []
    for ci, c in enumerate(classes):
        d = os.path.join(data, split, c)
        for f in sorted(os.listdir(d)):
            with Image.open(os.path.join(d, f)) as im:
                xs.append(np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR)))
            ys.append(ci)
    return np.stack(xs), np.array(ys)

t0 = time.time()
sets = {s: load(s) for s in ("train", "val", "test")}
print(f"loaded in {time.time()-t0:.0f}s", flush=True)
base = keras.applications.MobileNet(input_shape=(size, size, 3), alpha=0.75, include_top=False,
                                    weights=os.path.join(weights, "mobilenet_7_5_224_tf_no_top.h5"), pooling="avg")
timings = {}
def feats(x, name):
    t = time.time()
    f = base.predict(preprocess_input(x.astype("float32")), batch_size=64, verbose=0)
    timings[name] = time.time() - t
    print(f"features {name}: {len(x)} in {timings[name]:.0f}s ({len(x)/timings[name]:.1f}/s)", flush=True)
    return f

F = {}
for s in ("train", "val", "test"):
    F[s] = feats(sets[s][0], s)
    F[s + "_flip"] = feats(sets[s][0][:, :, ::-1], s + "_flip")
gen = ImageDataGenerator(rotation_range=40, width_shift_range=0.2, height_shift_range=0.2, shear_range=0.2,
                         zoom_range=0.2, channel_shift_range=0.2, horizontal_flip=True, fill_mode="nearest")
rng = np.random.default_rng(0)
for k in range(k_aug):
    xa = np.stack([gen.random_transform(x.astype("float32"), seed=int(rng.integers(1 << 30))) for x in sets["train"][0]])
    F[f"aug{k}"] = feats(xa, f"aug{k}")

nc = len(classes)
def head(xtr, ytr, epochs=60, lr=1e-3):
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((xtr.shape[1],)), keras.layers.Dropout(0.5),
                          keras.layers.Dense(nc, kernel_regularizer=keras.regularizers.l2(0.001)),
                          keras.layers.Activation("softmax")])
    m.compile(keras.optimizers.Adam(lr), "categorical_crossentropy", metrics=["accuracy"])
    t = time.time()
    m.fit(xtr, keras.utils.to_categorical(ytr, nc), batch_size=64, epochs=epochs, verbose=0,
          validation_data=(F["val"], keras.utils.to_categorical(sets["val"][1], nc)),
          callbacks=[keras.callbacks.EarlyStopping("val_accuracy", patience=8, restore_best_weights=True)])
    fit_s = time.time() - t
    def acc(split):
        p = m.predict(F[split], verbose=0); pf = m.predict(F[split + "_flip"], verbose=0)
        y = sets[split][1]
        return float((p.argmax(1) == y).mean()), float(((p + pf).argmax(1) == y).mean())
    v, vt = acc("val"); te, tet = acc("test")
    return dict(val=v, val_tta=vt, test=te, test_tta=tet, head_fit_s=fit_s)

ytr = sets["train"][1]
results = {}
views = {"orig": ["train"], "orig+flip": ["train", "train_flip"]}
for k in range(k_aug):
    views[f"orig+flip+{k+1}aug"] = ["train", "train_flip"] + [f"aug{j}" for j in range(k + 1)]
for name, keys in views.items():
    r = head(np.concatenate([F[k] for k in keys]), np.concatenate([ytr] * len(keys)))
    r["extract_s"] = sum(timings[k] for k in keys) + timings["val"] + timings["test"]
    results[name] = r
    print(name, json.dumps(r), flush=True)
json.dump(dict(size=size, results=results, timings=timings), open(out, "w"), indent=1)
