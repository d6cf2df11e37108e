"""Test app that crashes at import, the way a serve job with a missing model file does.

The job's logs should contain the line printed first and then a traceback that ends in
"RuntimeError: model file missing: weights.h5".
"""

from flask import Flask

app = Flask(__name__)

print("broken app: loading model from weights.h5", flush=True)

raise RuntimeError("model file missing: weights.h5")
