"""Reading labelled photos: dataset layouts and archives, image checks and loading, Vision's crop options, augmentation, the digits dataset."""
