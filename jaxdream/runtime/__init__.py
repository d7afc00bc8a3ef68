"""Per-call runtime state: compiled-function caches owned by a pipeline or model (never module globals),
and the registry through which shared compiled code reaches each caller's own callbacks."""

from jaxdream.runtime.callbacks import CallbackRegistry
from jaxdream.runtime.compile_cache import CompileCache, Structure, compiled
from jaxdream.runtime.compiler import compiler_options
