"""Augmentation beside transforms.py's image ops: mixing of images and labels (CutMix/MixUp)."""
