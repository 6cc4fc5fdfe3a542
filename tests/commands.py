"""The command lines tests run, as the user types them."""

from __future__ import annotations

import sys

FAQ_DEPLOY = [sys.executable, "-m", "faq_deploy"]
FAQ_RUN = [sys.executable, "-m", "faq_runtime.cli"]
# FAQ at a tiny calibration budget: the whole algorithm, in seconds instead of minutes
TINY_FAQ = ["--samples", "2", "--seq-len", "128", "--search-rows", "1"]
