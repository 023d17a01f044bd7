"""
Where prepare.py's documents come from, checked before any work: local parquet files, FineWeb's shards on
the Hugging Face Hub (listed by its API, downloaded through its cache), or any dataset streamed by `datasets`.

A source is a dict: name (as meta.json records it), size in bytes (None for a stream), and how to read it:
path (a local file), repo + remote (a file on the Hub, downloaded when its turn comes), or stream.
"""
import glob
import json
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kit.atomic import atomic_write  # the repo root is on the path: prepare.py puts it there
from configurator import first_line

HF_REPO = "HuggingFaceFW/fineweb"
DEFAULT_DUMP = "CC-MAIN-2013-20"
STREAM_BATCH = 1024  # documents per batch when streaming a `datasets` dataset


class PrepareError(Exception):
    """A problem the user can fix; main() prints it as one line `error: ...` and exits with status 2."""


# -----------------------------------------------------------------------------
# local parquet files

def resolve_inputs(patterns):
    """The files named by --input: files, globs and folders, each expanded in sorted order."""
    paths = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found, nothing = sorted(path.glob("*.parquet")), f"{path}: the folder holds no .parquet files"
        elif glob.has_magic(pattern):
            found, nothing = sorted(Path(p) for p in glob.glob(pattern) if not Path(p).is_dir()), \
                f"--input {pattern!r} matches no files"
        else:
            found, nothing = [path] if path.exists() else [], f"{path}: no such file"
        if not found:
            raise PrepareError(nothing)
        paths += [p.resolve() for p in found]
    return paths


def describe_parquet(path):
    """Check one parquet file and describe what the tokenizer tasks need: rows, row groups, columns."""
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise PrepareError(f"{path}: not a parquet file ({first_line(e)})")
    schema = parquet.schema_arrow
    if "text" not in schema.names:
        raise PrepareError(f"{path}: no 'text' column; it has: {', '.join(schema.names)}")
    text_type = schema.field("text").type
    values = text_type.value_type if pa.types.is_dictionary(text_type) else text_type
    if str(values) not in ("string", "large_string", "string_view", "null"):  # read back as str (null: all None)
        hint = " (bytes, not text: decode it, e.g. pyarrow.compute.cast(column, pa.string()))" \
            if pa.types.is_binary(text_type) or pa.types.is_large_binary(text_type) else ""
        raise PrepareError(f"{path}: column 'text' holds {text_type}, expected strings{hint}")
    if parquet.metadata.num_rows == 0:
        raise PrepareError(f"{path}: the parquet is empty (0 rows)")
    return {"path": str(path), "documents": parquet.metadata.num_rows,
            "row_group_rows": [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)],
            "has_token_count": "token_count" in schema.names and pa.types.is_integer(schema.field(
                "token_count").type)}  # FineWeb's; a column of that name holding anything else is not it


def local_source(path):
    """A checked local parquet file; its name, size and mtime identify it for the no-op check and resuming."""
    if not path.is_file():  # parquet is read from its end: a pipe or a device cannot seek, a FIFO would even block
        raise PrepareError(f"{path}: not a regular file (a pipe, a device or a socket); prepare.py reads "
                           f"parquet files, which it must be able to seek in")
    describe_parquet(path)  # a bad input fails before any work
    stat = path.stat()
    return {"name": str(path), "path": str(path), "size": stat.st_size, "mtime": stat.st_mtime}


# -----------------------------------------------------------------------------
# FineWeb shards on the Hugging Face Hub

def list_shards(repo, folder):
    """The .parquet files of one folder of a Hub dataset, sorted by name: [{path, size, blob_id}]. From the
    Hub's listing API, kept in a cache so that the same command works offline later."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.utils import EntryNotFoundError, RepositoryNotFoundError
    cache = Path(constants.HF_HOME) / "fineweb-gpt" / "listings" / (f"{repo}/{folder}".replace("/", "--") + ".json")
    try:
        entries = list(HfApi().list_repo_tree(repo, path_in_repo=folder, repo_type="dataset"))
    except RepositoryNotFoundError:
        raise PrepareError(f"--repo {repo}: no such dataset on the Hugging Face Hub (or it needs a login)")
    except EntryNotFoundError:  # the folder is not in the repo (404)
        raise PrepareError(f"{repo} has no folder {folder}; the valid names are the folders at "
                           f"https://huggingface.co/datasets/{repo}/tree/main/{folder.rsplit('/', 1)[0]}")
    except Exception as e:  # offline, unreachable, ...: a listing from an earlier run will do
        if cache.exists():
            return json.loads(cache.read_text())
        raise PrepareError(f"cannot list {repo}/{folder} ({type(e).__name__}: {first_line(e)}) and no earlier run "
                           f"cached its listing; run once with a network, or download the files and pass --input")
    shards = sorted(({"path": e.path, "size": e.size, "blob_id": e.blob_id} for e in entries
                     if e.path.endswith(".parquet") and hasattr(e, "size")), key=lambda shard: shard["path"])
    if not shards:
        raise PrepareError(f"{repo}/{folder} holds no .parquet files")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(cache, "w") as f:  # whole or not at all: a killed run must not leave half a listing
            json.dump(shards, f)
    except OSError:
        pass  # the cache only spares a later offline run the network; this run has what it needs
    return shards


def hub_sources(args):
    """The shards --shard/--shards picks from the folder --dump or --subset names: data/<dump>, sample/<size>."""
    repo, folder = args.repo, "data/" + (args.dump or DEFAULT_DUMP)
    if args.subset is not None:
        if not args.subset.startswith("sample-"):
            raise PrepareError(f"--subset {args.subset}: FineWeb's subsets are its samples, named like sample-10BT; "
                               f"a dump is chosen with --dump")
        folder = "sample/" + args.subset.removeprefix("sample-")
    first, last = args.shards or (args.shard or 0, args.shard or 0)
    shards = list_shards(repo, folder)
    if last >= len(shards):
        raise PrepareError(f"{repo}/{folder} has {len(shards)} files (shards 0-{len(shards) - 1}); "
                           f"--shard/--shards asks for {first}-{last}")
    return [{"name": f"hf://datasets/{repo}/{shard['path']}", "repo": repo, "remote": shard["path"],
             "size": shard["size"], "blob_id": shard["blob_id"]} for shard in shards[first:last + 1]]


def download_shard(source):
    """The shard's local path, through huggingface_hub: its cache, its resume, its retries."""
    from huggingface_hub import hf_hub_download  # imported here: only the download path needs it
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError
    repo, filename = source["repo"], source["remote"]
    try:
        return Path(hf_hub_download(repo_id=repo, repo_type="dataset", filename=filename))
    except LocalEntryNotFoundError:  # raised for "offline" and for "could not connect" alike
        raise PrepareError(f"cannot download {filename} from {repo}: the network is unreachable (or HF_HUB_OFFLINE "
                           f"is set) and it is not in the cache; fetch it elsewhere and pass --input PATH")
    except EntryNotFoundError:
        raise PrepareError(f"{repo} has no file {filename} any more: its listing is stale; run with a network")
    except Exception as e:  # a download boundary: whatever went wrong, say it in one line with the way out
        raise PrepareError(f"cannot download {filename} from {repo} ({type(e).__name__}: {first_line(e)}); "
                           f"fetch it elsewhere and pass --input PATH")


class Prefetch(threading.Thread):
    """A source's file made local: a Hub shard downloads in this thread while the one before is tokenized.
    A daemon thread: an error or Ctrl-C does not wait for a download to end."""

    def __init__(self, source):
        super().__init__(daemon=True)
        self.source, self.error, self.is_download = source, None, bool(source.get("remote"))
        self.path = Path(source["path"]) if "path" in source else None
        if self.is_download:
            self.start()

    def run(self):
        try:
            self.path = download_shard(self.source)
        except Exception as e:  # raised in the main thread by wait()
            self.error = e

    def wait(self):
        if self.is_download:
            self.join()
        if self.error is not None:
            raise self.error
        return self.path


# -----------------------------------------------------------------------------
# any dataset through the `datasets` package, streamed

def dataset_source(args):
    name = f"hf-datasets://{args.hf_dataset}" + "".join(f"/{part}" for part in (args.hf_config, args.hf_split) if part)
    return {"name": name, "stream": True, "size": None, "data_files": args.hf_data_files}


def stream_batches(args):
    """(index of the first, texts) for batches of up to STREAM_BATCH documents of --hf_dataset, streamed:
    nothing is downloaded in full."""
    try:
        import datasets
    except ImportError:
        raise PrepareError("--hf_dataset needs the `datasets` package: pip install datasets")
    first_doc = 0
    try:
        dataset = datasets.load_dataset(args.hf_dataset, args.hf_config, split=args.hf_split, streaming=True,
                                        data_files=args.hf_data_files)
        for batch in dataset.iter(batch_size=STREAM_BATCH):
            if args.text_column not in batch:
                raise PrepareError(f"--hf_dataset {args.hf_dataset}: no column {args.text_column!r} (--text_column); "
                                   f"it has: {', '.join(batch)}")
            texts = batch[args.text_column]
            if not all(text is None or isinstance(text, str) for text in texts):
                raise PrepareError(f"--hf_dataset {args.hf_dataset}: column {args.text_column!r} does not hold strings")
            yield first_doc, texts
            first_doc += len(texts)
    except PrepareError:
        raise
    except Exception as e:  # a download/parsing boundary: one line with what datasets said
        raise PrepareError(f"--hf_dataset {args.hf_dataset}: cannot read it ({type(e).__name__}: {first_line(e)})")
