"""Training with Ray Train and COCO evaluation (``maskray.pipeline.train.driver.train``)."""
