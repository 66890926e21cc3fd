"""Getting bytes in and out: URIs, the Hub, S3, model sources, corpora, atomic files, fingerprints."""
