"""Health check of the S3 server: ready once it answers HTTP at all (403 without credentials)."""

import os
import sys
import urllib.error
import urllib.request

try:
    urllib.request.urlopen(os.environ.get("S3_URL", "http://127.0.0.1:9000"), timeout=4)
except urllib.error.HTTPError:
    pass  # an answer: the server is up
except OSError as error:
    sys.exit(f"S3 server not ready: {error}")
