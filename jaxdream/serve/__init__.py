"""`jaxdream serve`: an AUTOMATIC1111/SD.Next-compatible HTTP API (`/sdapi/v1/...`) and web page over one
loaded model, with a bounded queue whose worker batches concurrent compatible requests into one compiled
sampling loop, each image with its own prompt, seed, guidance and LoRA adapter."""

from jaxdream.serve.app import create_app
from jaxdream.serve.engine import Engine
from jaxdream.serve.limits import Limits, check_bind
from jaxdream.serve.queue import BatchQueue
