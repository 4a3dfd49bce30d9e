"""A second task, written the way a user adapting the template would write theirs: 8x8 images of 4 classes, integer
labels, its own networks, a plain LightningModule with torchmetrics that takes its network and optimizer as objects,
and a plain DataLoader (or torchdata's StatefulDataLoader). No machinery file knows it: the machinery's tests and the
conformance suite run on it."""
