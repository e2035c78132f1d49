"""Reading labelled photos: dataset layouts and archives, image checks and loading, the label map, Vision's crop
options, augmentation and class balance, the digits dataset."""
