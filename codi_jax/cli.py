"""The `codi-jax` command: one entry point, one subcommand per job.

  codi-jax <command> [flags]        codi-jax <command> --help
"""

from __future__ import annotations

import importlib
import sys

from absl import app

COMMANDS = {
    "demo": ("codi_jax.commands.demo",
             "the main job: train tiny CoDi stage by stage, then generate and score"),
    "parity": ("codi_jax.commands.parity", "compare with the original CoDi's reference fixtures"),
    "inspect": ("codi_jax.commands.inspect", "parameter counts of a config (no memory used)"),
    "data-throughput": ("codi_jax.commands.data", "examples/s of a stage's input pipeline"),
    "import-data": ("codi_jax.commands.import_data", "WebDataset shards / manifests -> records"),
    "build-dataset": ("codi_jax.commands.build_dataset", "write a tfds dataset (ArrayRecord)"),
    "cache": ("codi_jax.commands.cache", "run frozen encoders once: cached latents + tokens"),
    "generate": ("codi_jax.commands.generate", "any-to-any generation from a model checkpoint"),
    "sample": ("codi_jax.commands.sample", "sharded, resumable sampling over a JSONL manifest"),
    "eval": ("codi_jax.commands.eval",
             "the any-to-any benchmark: attribute accuracy, multi-input, joint agreement"),
    "train": ("codi_jax.commands.train", "train one stage (sharded, resumable, preemptible)"),
    "compile-check": ("codi_jax.commands.compile_check",
                      "AOT-compile a stage's train step for a TPU topology: memory, FLOPs, fits"),
    "convert": ("codi_jax.commands.convert", "released PyTorch CoDi weights -> a checkpoint"),
    "export": ("codi_jax.commands.export", "a checkpoint -> safetensors (torch or flax names)"),
    "bench": ("codi_jax.commands.bench",
              "performance: train-step or sampling throughput, MFU, memory"),
}


def usage() -> str:
  lines = ["usage: codi-jax <command> [flags]   (codi-jax <command> --help for its flags)", "",
           "commands:"]
  width = max(map(len, COMMANDS))
  lines += [f"  {name:{width}s}  {summary}" for name, (_, summary) in COMMANDS.items()]
  return "\n".join(lines)


def _enable_compilation_cache() -> None:
  """Persistent XLA cache, so a second run skips recompiling (the tiny model's random init alone
  takes ~40 s to compile on a CPU). JAX_COMPILATION_CACHE_DIR wins; CODI_JAX_CACHE=off disables."""
  import os
  import pathlib

  import jax

  if os.environ.get("CODI_JAX_CACHE") == "off" or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  if os.environ.get("CODI_COORDINATOR"):
    # Local multi-process runs use gloo collectives, which time out after 30 s: a cache hit in
    # one process and a compile in another would make them reach a collective too far apart.
    return
  cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache"))
  jax.config.update("jax_compilation_cache_dir", str(cache / "codi-jax" / "xla"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(usage())
    sys.exit(0 if len(argv) >= 2 else 2)
  command = argv[1]
  if command not in COMMANDS:
    print(f"codi-jax: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
    sys.exit(2)
  try:  # a config flag reads its overrides from argv when its command's module defines it
    module = importlib.import_module(COMMANDS[command][0])
  except (ValueError, AttributeError, KeyError, TypeError) as e:
    if not any(a.startswith("--config") for a in argv[2:]):
      raise  # not a flag's doing
    _bad_flag(command, e)
  rest = argv[2:]
  if "-h" in rest or "--help" in rest:
    from absl import flags

    print((module.__doc__ or "").strip() + "\n\nflags:")
    names = set()
    for mod in (module.__name__, "codi_jax.commands.common"):
      names |= {f.name for f in flags.FLAGS.get_flags_for_module(mod)}
    for name in sorted(names):
      f = flags.FLAGS[name]
      print(f"  --{name}: {f.help}\n      (default: {f.default_as_str or 'none'})")
    sys.exit(0)
  from codi_jax.parallel.distributed import initialize_from_env

  _enable_compilation_cache()
  initialize_from_env()
  app.run(lambda args: sys.exit(_run(module, command, args)), argv=[f"codi-jax {command}"] + rest,
          flags_parser=lambda argv: _parse_flags(command, argv))


def _parse_flags(command: str, argv: list[str]) -> list[str]:
  """absl's flag parsing, every error one line: a bad value (`flags.Error`; a config flag's
  message carries the config file's traceback, of which the last line says what is wrong) or a
  config flag's own errors (an unknown preset raises ValueError)."""
  from absl import flags

  try:
    return flags.FLAGS(argv)
  except (flags.Error, ValueError, AttributeError, KeyError, TypeError) as e:
    _bad_flag(command, e)


def _bad_flag(command: str, error: Exception) -> None:
  import os

  if os.environ.get("CODI_DEBUG") == "1":
    raise error
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  what = lines[-1] if lines else repr(error)
  while len(what) > 1 and what[0] == what[-1] and what[0] in "\"'":  # KeyError-style quoting
    what = what[1:-1]
  if isinstance(error, (AttributeError, KeyError)):  # a --config.<path>=... override
    what = f"the config has no field {what!r} (a --config.<field> override names it)"
  _fail(command, f"bad flag: {what}")


def _run(module, command: str, args: list[str]) -> int:
  """The command's main; an expected failure (a bad setting or input: ValueError; a file that
  cannot be read or written: OSError) becomes one line naming it, not a traceback, unless
  CODI_DEBUG=1."""
  import os

  try:
    return module.main(args)
  except (ValueError, OSError) as e:
    if os.environ.get("CODI_DEBUG") == "1":
      raise
    _fail(command, str(e))


def _fail(command: str, message: str) -> None:
  """Ends the command with one line on stderr and exit status 1."""
  raise SystemExit(f"codi-jax {command}: error: {message}  (CODI_DEBUG=1 shows the traceback)")


if __name__ == "__main__":
  main()
