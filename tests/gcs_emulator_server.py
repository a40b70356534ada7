"""gcp-storage-emulator as `python -m gcp_storage_emulator`, plus what tensorstore needs of GCS.

GCS answers a media download with the object's generation (`x-goog-generation`) and honours
`ifGenerationNotMatch` (304 when it matches). The emulator does neither; tensorstore revalidates
an OCDBT manifest with exactly such a request when several arrays commit at once, and then fails
the save with "Malformed StorageGeneration" (about one save in ten). This wraps the download
handler before the emulator's routes are built, then runs its command line.
"""

from http import HTTPStatus

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except NotFound:
        return _download(request, response, storage, *args, **kwargs)
    generation = str(obj.get("generation") or "0")
    if request.query.get("ifGenerationNotMatch", [None])[0] == generation:
        response.status = HTTPStatus.NOT_MODIFIED
        return None
    response["x-goog-generation"] = generation
    response["x-goog-metageneration"] = str(obj.get("metageneration") or "1")
    return _download(request, response, storage, *args, **kwargs)


objects.download = download

if __name__ == "__main__":
    from gcp_storage_emulator.__main__ import main  # Builds the routes from objects.download.

    main()
