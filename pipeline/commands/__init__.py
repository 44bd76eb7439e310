"""Commands on a finished output folder: search, classification heads, rebuilding the index, embedding queries as the run did."""
