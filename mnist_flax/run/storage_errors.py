"""What a gs:// workdir's storage raises, as the one line a user reads: a refused write (403,
with the gcloud fix), the network or the bucket gone (before a run, or in the middle of one)."""

from __future__ import annotations

import re

from mnist_flax.checkpoints import error_line


def forbidden_reason(e: OSError, bucket: str) -> str | None:
    """If the bucket refused a write (HTTP 403; gcsfs raises OSError('Forbidden: ...')), who may
    not write to it and the fix, from GCS's answer ('PRINCIPAL does not have
    storage.objects.create access to ...'); else None."""
    if not (isinstance(e, PermissionError) or str(e).startswith("Forbidden")):
        return None
    found = re.search(r"(\S+) does not have (storage\.[\w.]+) access", str(e))
    if found:
        principal, permission = found.groups()
        reason = f"{principal} lacks {permission} on bucket {bucket}"
        member = (f"serviceAccount:{principal}" if principal.endswith(".gserviceaccount.com")
                  else f"user:{principal}")
    else:
        reason = f"this machine's credentials may not write to bucket {bucket}"
        member = "PRINCIPAL"
    return (f"403 Forbidden: {reason}); grant write access (gcloud storage buckets "
            f"add-iam-policy-binding gs://{bucket} --member={member} "
            "--role=roles/storage.objectAdmin) or pick another bucket")


# Where the clients of a gs:// workdir (google-cloud-storage, gcsfs) raise from when the network
# or the bucket goes away, after their own retries.
_STORAGE_ERROR_MODULES = ("google.api_core.", "google.auth.", "aiohttp.", "requests.", "urllib3.")


def is_storage_error(e: BaseException) -> bool:
    return isinstance(e, ConnectionError | TimeoutError) or any(
        type(e).__module__.startswith(m) for m in _STORAGE_ERROR_MODULES)


def storage_unreachable_line(workdir: str, e: BaseException) -> str:
    """The one-line error for a workdir whose storage does not answer (network, endpoint)."""
    return (f"--workdir={workdir}: its storage did not answer ({error_line(e)}); check the "
            "network and the bucket, then run again")


def storage_stopped_line(why: str) -> str:
    """The one-line error for a run whose workdir's storage stopped answering mid-run."""
    return (f"the workdir's storage stopped answering ({why}); the last committed checkpoint is "
            "intact; run the same command again when it answers")
