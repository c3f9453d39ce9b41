"""The Hugging Face hub: is it reachable, and if not, switch the HF libraries to offline mode so they fail fast."""

from __future__ import annotations

import os
import ssl
import threading
import urllib.error
import urllib.request

import datasets.config
import huggingface_hub.constants

HUB_TIMEOUT_S = 3.0


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """True if the Hugging Face hub answers an HTTP HEAD request within ``timeout`` (and offline mode is off). HTTP,
    not a TCP connect: it goes through $HTTPS_PROXY as the hub clients do, and a middlebox that never answers is offline."""
    if any(os.environ.get(k, "0").lower() not in ("0", "false", "") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    url = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/") + "/"
    result: list[bool] = []

    def probe() -> None:
        try:
            import certifi  # the CA bundle the hub clients use (the system's may be missing)

            context = ssl.create_default_context(cafile=certifi.where())
        except ImportError:
            context = None
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout, context=context).close()
            result.append(True)
        except urllib.error.HTTPError as e:  # it answered; 5xx: a proxy that cannot reach it, or the hub is down
            result.append(e.code < 500)
        except (OSError, ValueError):  # DNS, refused, timeout, TLS (URLError is an OSError)
            result.append(False)

    # in a thread: a DNS lookup that hangs is not covered by the socket timeout
    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(result and result[0])


def go_offline() -> None:
    """Switch datasets/transformers/huggingface_hub to offline mode (cache only, no retries)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
    if hasattr(datasets.config, "HF_DATASETS_OFFLINE"):
        datasets.config.HF_DATASETS_OFFLINE = True
