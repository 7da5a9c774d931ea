"""Golden digests that say where they moved: a digest per site beside the digest of the whole."""

from __future__ import annotations


def first_moved(actual: dict[str, str], expected: dict[str, str]) -> str | None:
    """The first site, in sorted order, whose digest differs (or that one side lacks); None if none."""
    for site in sorted(set(actual) | set(expected)):
        if actual.get(site) != expected.get(site):
            return f"{site} (digest {actual.get(site, 'missing')}, golden {expected.get(site, 'missing')})"
    return None
