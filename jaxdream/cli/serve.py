"""`jaxdream serve`: the AUTOMATIC1111-compatible HTTP API and web page (jaxdream.serve) under uvicorn."""

from __future__ import annotations

import logging
import signal
import sys
import time

from jaxdream.cli.args import check_output, int_between, positive_float


def _model_folder(model: str) -> str:
  """A model folder, or a built-in model's (builtin:tiny is made once in the user's cache folder)."""
  from jaxdream.diffusion.tiny_model import builtin_model_folder

  return builtin_model_folder(model)


def make_uvicorn_server(app, queue, host: str, port: int):
  """A uvicorn server whose SIGTERM/SIGINT answer the queued requests with 503 at once, let the running batch
  finish (uvicorn waits for its open requests), and exit with status 0 (uvicorn would re-raise the signal)."""
  import uvicorn

  class Server(uvicorn.Server):
    def handle_exit(self, sig, frame):
      queue.close(wait=False)
      if self.should_exit and sig == signal.SIGINT:
        self.force_exit = True
      self.should_exit = True

  return Server(uvicorn.Config(app, host=host, port=port, log_level='warning', access_log=False))


def _serve(args):
  from jaxdream.serve.app import create_app, make_server, warm_up
  from jaxdream.serve.limits import ApiError, Limits, check_bind, parse_auth

  check_bind(args.host, args.api_auth, args.insecure)
  users = parse_auth(args.api_auth)
  check_output('--outdir', args.outdir, folder=True)  # save_images writes there: a file would fail each request
  limits = Limits(max_size=args.max_size, max_steps=args.max_steps, max_body_bytes=int(args.max_body_mb * 2**20))
  logging.basicConfig(level=logging.INFO, format='%(message)s', stream=sys.stderr)
  logging.getLogger('jaxdream.serve').setLevel(logging.INFO)
  t0 = time.perf_counter()
  try:
    server = make_server(
      _model_folder(args.model),
      models_dir=args.models_dir,
      lora_dir=args.lora_dir,
      config_dir=args.config_dir,
      max_batch=args.max_batch,
      queue_size=args.queue_size,
      limits=limits,
      users=users,
      devices=args.devices,
      allow_pickle=args.allow_pickle,
      outdir=args.outdir,
      lora_cache=args.lora_cache,
      lora_cache_mb=args.lora_cache_mb,
      embeddings_dir=args.embeddings_dir,
    )
  except ApiError as e:  # what a request would get as a 4xx is, at start-up, a usage error
    raise ValueError(e.detail) from None
  if args.warmup_steps > 0:
    warm_up(server, steps=args.warmup_steps)
  print(
    f'jaxdream serve: model {server.engine.current} loaded{" and compiled" * (args.warmup_steps > 0)} in '
    f'{time.perf_counter() - t0:.1f} s; http://{args.host}:{args.port}/ (API docs at /docs)',
    file=sys.stderr,
    flush=True,
  )
  make_uvicorn_server(create_app(server), server.queue, args.host, args.port).run()
  return 0


def _add_serve_parser(sub):
  s = sub.add_parser(
    'serve',
    help='an AUTOMATIC1111-compatible HTTP API (sdapi/v1) and web page, batching concurrent requests',
    description='Serve a model over the AUTOMATIC1111 / SD.Next web API (/sdapi/v1/txt2img, img2img, progress, '
    'options, loras, ...) and a web page at /. Concurrent compatible requests (same model, size, steps, sampler) '
    'are generated in one batch, each with its own prompt, seed, guidance and <lora:name:weight>.',
  )
  s.add_argument(
    '--model',
    required=True,
    help="diffusers-format model folder, or 'builtin:tiny-base' (jaxdream's own tiny model), 'builtin:tiny' (random)",
  )
  s.add_argument(
    '--models-dir',
    help='folder of more models, chosen with sd_model_checkpoint: diffusers folders and single-file .safetensors '
    'checkpoints (original layout; configs from a NAME.config folder beside the file, --config-dir, or else the '
    'published model of the type its keys say)',
  )
  s.add_argument(
    '--config-dir', help='diffusers folder (weights not needed) whose configs single-file checkpoints load with'
  )
  s.add_argument(
    '--outdir',
    default='outputs/serve',
    help='where requests with save_images write their PNGs, as A1111: OUTDIR/txt2img-images/DATE/NNNNN-SEED.png '
    '(default outputs/serve)',
  )
  s.add_argument('--lora-dir', help='folder of LoRA files for <lora:name:weight> prompt tags')
  s.add_argument(
    '--embeddings-dir',
    help="folder of textual inversion embeddings (.safetensors; .pt with --allow-pickle), as A1111's embeddings/: "
    'a prompt names one by its file name (a whole word, any case); those of another model are listed as skipped',
  )
  s.add_argument(
    '--lora-cache',
    type=int_between(0),
    default=64,
    help='LoRA adapters (files, and combinations of several tags) kept read, least recently used dropped (default 64)',
  )
  s.add_argument(
    '--lora-cache-mb',
    type=positive_float,
    default=1024,
    help='and at most this many MiB of their factors (default 1024)',
  )
  s.add_argument('--host', default='127.0.0.1', help='address to bind (default 127.0.0.1: this machine only)')
  s.add_argument('--port', type=int_between(1, 65535), default=7860)
  s.add_argument('--api-auth', help='HTTP basic auth, user:password[,user2:password2]; needed beyond loopback')
  s.add_argument('--insecure', action='store_true', help='allow a non-loopback --host without --api-auth')
  s.add_argument('--max-batch', type=int_between(1), default=8, help='images per sampler call (default 8)')
  s.add_argument(
    '--devices', type=int, default=1, help='split each batch over this many devices (-1: all of them; default 1)'
  )
  s.add_argument(
    '--queue-size', type=int_between(1), default=64, help='requests queued or running before 429 (default 64)'
  )
  s.add_argument('--max-size', type=int_between(8), default=2048, help='largest width/height in pixels (default 2048)')
  s.add_argument('--max-steps', type=int_between(1), default=150, help='most steps per request (default 150)')
  s.add_argument('--max-body-mb', type=positive_float, default=32, help='largest request body in MiB (default 32)')
  s.add_argument(
    '--warmup-steps',
    type=int,
    default=20,
    help="compile the loop at start-up for the model's own size, this many steps, Euler (0: no warm-up)",
  )
  s.add_argument(
    '--allow-pickle', action='store_true', help='also load pickle (.bin/.ckpt) weights; they can run code when loaded'
  )
  s.set_defaults(fn=_serve)
