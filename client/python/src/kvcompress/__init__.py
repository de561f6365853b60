"""kvcompress: Python SDK for kvcd (see client/python/README.md)."""

from kvcompress._proto import kvcompress_pb2 as pb
from kvcompress.client import (MAX_CHUNK_DATA_BYTES, Client, CompressResult, KvcError,
                               LayerInput, LayerOutput, Stream)
from kvcompress.method import HeadBudget, LayerBudget, Method, Reducer

__all__ = ["Client", "CompressResult", "HeadBudget", "KvcError", "LayerBudget", "LayerInput",
           "LayerOutput", "MAX_CHUNK_DATA_BYTES", "Method", "Reducer", "Stream", "pb"]
__version__ = "0.1.0"
