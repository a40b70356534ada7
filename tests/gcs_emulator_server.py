"""gcp-storage-emulator as `python -m gcp_storage_emulator`, plus what the tests need of GCS.

It wraps the emulator's handlers before its routes are built, then runs its command line, with
one option of its own: `--read-only-bucket=NAME` (repeatable). What it adds, each as GCS does it:

- Generation headers. GCS answers a media download with the object's generation
  (`x-goog-generation`) and honours `ifGenerationNotMatch` (304 when it matches). The emulator
  does neither; tensorstore revalidates an OCDBT manifest with exactly such a request when several
  arrays commit at once, and then fails the save with "Malformed StorageGeneration" (about one
  save in ten).
- Generation preconditions. The query parameters `ifGenerationMatch` (0: the object must not
  exist), `ifGenerationNotMatch`, `ifMetagenerationMatch` and `ifMetagenerationNotMatch` are
  checked against the object's current state before an upload (media, multipart, and every
  request of a resumable one, whose upload URL carries the initiating request's query), a delete,
  a patch, a copy/rewrite/compose (against the destination), a metadata GET and a download; one
  that does not hold is a 412 with GCS's JSON error (304 for `ifGenerationNotMatch` on a read).
  The emulator serves one request at a time, so the check and the write are atomic, as on GCS:
  of two writers racing with `ifGenerationMatch=0`, one gets 412. Not checked: batch requests.
- `moveTo` (objects.move, which gcsfs tries first for every file of a rename): a copy then a
  delete of the source, with `ifSourceGeneration[Not]Match`/`ifSourceMetageneration[Not]Match`
  checked against the source and the others against the destination. Without it the emulator
  answers 501, and gcsfs retries that for ~35 s before falling back to copy and delete.
- `100 Continue`. An HTTP/1.1 server answers a request sent with `Expect: 100-continue` at once
  (RFC 9110, 10.1.1); curl, so tensorstore, sends it before an upload over 1 MiB. The emulator
  never answered it, so curl waited a second before each such upload: most of a checkpoint
  save's time into gs://.
- Writes that cost the same however full the emulator is. After every write the emulator
  serializes all objects' metadata (deleted ones too) to JSON, only to read it back when it next
  starts on the same data directory; a session's emulator fills with thousands of objects, so
  every write slowed as the session went on. In memory (`--in-memory`, nothing to start again on)
  it is not written.
- Writes that survive the emulator being stopped. On disk, the emulator writes an object's bytes
  and its metadata file in place, so one stopped mid-write (as the outage tests stop it) left a
  truncated file and failed to start again on that data (`JSONDecodeError`). GCS never serves
  half a write; here each file is written beside its place and renamed into it.
- Read-only buckets. Every write or delete in a bucket named by `--read-only-bucket` (batch parts
  included) is a 403 with GCS's JSON error, as GCS answers a service account without
  storage.objects.create/delete; reads work.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from http import HTTPStatus

from gcp_storage_emulator import settings, storage
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

READ_ONLY_BUCKETS: set[str] = set()
SERVICE_ACCOUNT = "emulator@mnist-flax-test.iam.gserviceaccount.com"
CONDITIONS = ("GenerationMatch", "GenerationNotMatch", "MetagenerationMatch",
              "MetagenerationNotMatch")


def _error(response, status: HTTPStatus, reason: str, message: str) -> None:
    response.status = status
    response.json({"error": {"code": status.value, "message": message,
                             "errors": [{"message": message, "domain": "global",
                                         "reason": reason}]}})


def _forbidden(response, bucket: str, permission: str) -> None:
    _error(response, HTTPStatus.FORBIDDEN, "forbidden",
           f"{SERVICE_ACCOUNT} does not have storage.objects.{permission} access to the Google "
           f"Cloud Storage object. Permission 'storage.objects.{permission}' denied on resource "
           "(or it may not exist).")


def _failed_condition(query, obj: dict | None, prefix: str = "if") -> str | None:
    """The first `<prefix><Condition>` query parameter that `obj` (None: absent) fails."""
    generation = int(obj["generation"]) if obj else 0
    metageneration = int(obj.get("metageneration") or 1) if obj else None
    for condition in CONDITIONS:
        value = query.get(prefix + condition, [None])[0]
        if value is None:
            continue
        value = int(value)
        current = generation if condition.startswith("Generation") else metageneration
        if (current == value) == condition.endswith("NotMatch"):
            return prefix + condition
    return None


def _object(storage, bucket: str, name: str) -> dict | None:
    try:
        return storage.get_file_obj(bucket, name)
    except NotFound:
        return None


def _precondition_failed(response) -> None:
    _error(response, HTTPStatus.PRECONDITION_FAILED, "conditionNotMet",
           "At least one of the pre-conditions you specified did not hold.")


def _writes(handler, target, permission="create"):
    """`handler`, first refusing a write to a read-only bucket and checking preconditions against
    the object `target(request, storage)` names ((bucket, name), or None: the handler decides)."""

    def guarded(request, response, storage, *args, **kwargs):
        _ = request.data  # Read the body first: answered unread, it can reset the connection.
        where = target(request, storage)
        if where is not None:
            bucket, name = where
            if bucket in READ_ONLY_BUCKETS:
                return _forbidden(response, bucket, permission)
            if _failed_condition(request.query, _object(storage, bucket, name)):
                return _precondition_failed(response)
        return handler(request, response, storage, *args, **kwargs)

    return guarded


def _reads(handler):
    """`handler` (a metadata GET or a download), answering 304/412 when a precondition fails."""

    def guarded(request, response, storage, *args, **kwargs):
        obj = _object(storage, request.params["bucket_name"], request.params["object_id"])
        failed = obj and _failed_condition(request.query, obj)
        if failed == "ifGenerationNotMatch":
            response.status = HTTPStatus.NOT_MODIFIED
            return None
        if failed:
            return _precondition_failed(response)
        return handler(request, response, storage, *args, **kwargs)

    return guarded


def _named(request, storage):
    return request.params["bucket_name"], request.params["object_id"]


def _upload_target(request, storage):
    """The object an upload request creates: named in the query or the JSON metadata, or by the
    resumable upload its `upload_id` continues."""
    if "upload_id" in request.query:
        try:
            obj = storage.get_resumable_file_obj(request.query["upload_id"][0])
        except NotFound:
            return None
        return obj["bucket"], obj["name"]
    bucket = request.params["bucket_name"]
    if "name" in request.query:
        return bucket, request.query["name"][0]
    data = request.data if request.query.get("uploadType") != ["media"] else None
    meta = data.get("meta", data) if isinstance(data, dict) else {}
    return (bucket, meta["name"]) if meta.get("name") else None


def _destination(request, storage):
    return request.params["dest_bucket_name"], request.params["dest_object_id"]


_download = objects.download


def download(request, response, storage, *args, **kwargs):
    obj = _object(storage, request.params["bucket_name"], request.params["object_id"])
    if obj is not None:
        response["x-goog-generation"] = str(obj.get("generation") or "0")
        response["x-goog-metageneration"] = str(obj.get("metageneration") or "1")
    return _download(request, response, storage, *args, **kwargs)


def move(request, response, storage, *args, **kwargs):
    """objects.move within a bucket: the object under its new name, and the old one gone."""
    bucket, source = request.params["bucket_name"], request.params["object_id"]
    destination = request.params["dest_object_id"]
    if bucket in READ_ONLY_BUCKETS:
        return _forbidden(response, bucket, "create")
    obj = _object(storage, bucket, source)
    if obj is None:
        response.status = HTTPStatus.NOT_FOUND
        return None
    if (_failed_condition(request.query, obj, prefix="ifSource")
            or _failed_condition(request.query, _object(storage, bucket, destination))):
        return _precondition_failed(response)
    moved = objects._copy(request.base_url, storage, bucket, source, bucket, destination)
    storage.delete_file(bucket, source)
    response.json(moved)
    return None


def _batch_guard(handler, permission):
    """A batch part writing to a read-only bucket answers 403, the others as before."""

    def guarded(request, item, storage, bucket_name, object_id, meta, response):
        bucket = item.get("dest_bucket_name") or bucket_name
        if bucket not in READ_ONLY_BUCKETS:
            return handler(request, item, storage, bucket_name, object_id, meta, response)
        message = (f"{SERVICE_ACCOUNT} does not have storage.objects.{permission} access to the "
                   f"Google Cloud Storage object.")
        objects._batch_write_json(response, "HTTP/1.1 403 Forbidden", {"error": {
            "code": 403, "message": message,
            "errors": [{"message": message, "domain": "global", "reason": "forbidden"}]}})
        return True

    return guarded


objects.download = _reads(download)
objects.get = _reads(objects.get)
objects.insert = _writes(objects.insert, _upload_target)
objects.upload_partial = _writes(objects.upload_partial, _upload_target)
objects.xml_upload = _writes(objects.xml_upload, _named)
objects.delete = _writes(objects.delete, _named, "delete")
objects.patch = _writes(objects.patch, _named, "update")
objects.copy = _writes(objects.copy, _destination)
objects.rewrite = _writes(objects.rewrite, _destination)
objects.compose = _writes(objects.compose, _named)
for _method, _permission in (("DELETE", "delete"), ("PATCH", "update"), ("POST", "create")):
    objects._BATCH_METHOD_HANDLERS[_method] = _batch_guard(
        objects._BATCH_METHOD_HANDLERS[_method], _permission)

MOVE_ROUTE = (rf"^{re.escape(settings.API_ENDPOINT)}/b/(?P<bucket_name>[-.\w]+)/o/"
              r"(?P<object_id>.*[^/]+)/moveTo/o/(?P<dest_object_id>.*[^/]+)$", {"POST": move})


def _continuing(parse_request):
    """`parse_request`, then the interim `100 Continue` that a request with `Expect:
    100-continue` waits for. http.server sends it only when it speaks HTTP/1.1 itself, which the
    emulator does not."""

    def parse(self) -> bool:
        if not parse_request(self):
            return False
        if (self.headers.get("Expect", "").lower() == "100-continue"
                and self.request_version >= "HTTP/1.1"):
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.wfile.flush()
        return True

    return parse


def _persisted_unless_in_memory(write_config):
    """The emulator's metadata file, written only when a later emulator can read it."""

    @functools.wraps(write_config)
    def write(self) -> None:
        if not self._use_memory_fs:
            write_config(self)

    return write


def _whole_on_disk(write_bytes):
    """The store's `write_bytes`, which on disk writes a temporary file and renames it into place:
    a file holds its old bytes or its new ones, whenever the process stops."""

    @functools.wraps(write_bytes)
    def write(self, rel: str, content: bytes) -> None:
        if self._use_memory:
            return write_bytes(self, rel, content)
        path = self._disk_path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        partial.write_bytes(content)
        os.replace(partial, path)
        return None

    return write


def main(argv: list[str]) -> None:
    from gcp_storage_emulator import server  # Builds the routes from the handlers above.
    from gcp_storage_emulator.__main__ import main as emulator_main

    server.HANDLERS = (MOVE_ROUTE, *server.HANDLERS)  # Before the route that takes any object.
    storage.Storage._write_config_to_file = _persisted_unless_in_memory(
        storage.Storage._write_config_to_file)
    storage._FileStore.write_bytes = _whole_on_disk(storage._FileStore.write_bytes)
    server.RequestHandler.parse_request = _continuing(server.RequestHandler.parse_request)
    rest = []
    for arg in argv:
        if arg.startswith("--read-only-bucket="):
            READ_ONLY_BUCKETS.add(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    emulator_main(rest)


if __name__ == "__main__":
    main(sys.argv[1:])
