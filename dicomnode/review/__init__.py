"""Radiologists' review of AI findings: the findings index, verdicts back to PACS, key images.

- :mod:`~dicomnode.review.sr_read`: TID 1500 measurement groups, SEG frames, KOS references
  read back with pydicom;
- :mod:`~dicomnode.review.index`: a recorded job step's SR groups → ``findings`` rows (called by
  the runner in the step's delivery transaction); the worklist query;
- :mod:`~dicomnode.review.verdict`: accept / reject / amend → a verified SR, queued for the
  job's destinations, the finding's status moved and audited;
- :mod:`~dicomnode.review.images`: key images as PNGs with the segment outlined; a finding's
  measurements as its SR states them.

This layer sits between ``run`` (which indexes findings as steps are recorded) and
``package``; the web console, above it, calls these functions (``docs/review.md``).
"""

from dicomnode.review.images import (
    FindingDetail,
    KeyImage,
    choose_window,
    finding_detail,
    render_key_images,
)
from dicomnode.review.index import index_step, worklist
from dicomnode.review.verdict import (
    REVIEW_STEP_BASE,
    AlreadyReviewed,
    FindingNotFound,
    InvalidDecision,
    ReviewError,
    ReviewResult,
    review_finding,
    review_step,
)

__all__ = [
    "REVIEW_STEP_BASE",
    "AlreadyReviewed",
    "FindingDetail",
    "FindingNotFound",
    "InvalidDecision",
    "KeyImage",
    "ReviewError",
    "ReviewResult",
    "choose_window",
    "finding_detail",
    "index_step",
    "render_key_images",
    "review_finding",
    "review_step",
    "worklist",
]
