"""The segmentation job: a bucket of images in, Parquet instances out, resumable shard by shard
(``maskray.pipeline.segment.job.run_segment``)."""
