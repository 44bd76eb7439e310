"""Files in and out: input Parquet shards, the output folder (vector and reject parts, the manifest as commit point, the lock), and reading committed parts back."""
