"""Per-call runtime state: compiled-function caches owned by a pipeline or model (never module globals)."""

from jaxdream.runtime.compile_cache import CompileCache
