"""Everything before training: the entity catalog, images, captions and dataset splits."""
