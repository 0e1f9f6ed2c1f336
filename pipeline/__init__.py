"""Everything between storage and the model: listing and sharding, reading and decoding, Ray execution, Parquet output, querying."""
