"""Filter a list of URLs (one a line) before downloading OpenWebText-style documents.

    python tools/openwebtext/filter_urls.py --input urls.txt --output kept.txt \\
        [--domain-blacklist extra_domains.txt] [--rejected rejected.tsv]

Drops, in this order: malformed URLs (no http/https scheme, no host, whitespace or control
characters, a bad port), blacklisted domains (a built-in list of image/video/social/file hosts,
plus one domain a line from ``--domain-blacklist``; subdomains match too), blacklisted file
extensions (images, video, audio, archives, executables, pdf, office files), and duplicates
after normalisation (lowercase scheme and host, no fragment, no trailing slash). Kept URLs are
written as given, first occurrence first. Prints the count for each reason; ``--rejected``
writes ``url<TAB>reason`` lines.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterable, Iterator
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from owt_common import atomic_outputs, cli, format_counts, require_file  # noqa: E402

DEFAULT_DOMAIN_BLACKLIST = frozenset({
    # image and gif hosts
    "imgur.com", "flickr.com", "gfycat.com", "giphy.com", "gyazo.com", "imgflip.com",
    "photobucket.com", "500px.com", "deviantart.com", "tinypic.com", "postimg.cc", "ibb.co",
    "i.redd.it", "v.redd.it", "redd.it", "pinterest.com", "instagram.com",
    # video and audio
    "youtube.com", "youtu.be", "vimeo.com", "dailymotion.com", "twitch.tv", "streamable.com",
    "liveleak.com", "tiktok.com", "soundcloud.com", "spotify.com", "bandcamp.com", "vine.co",
    # social media and link aggregators
    "twitter.com", "x.com", "t.co", "facebook.com", "fb.com", "linkedin.com", "snapchat.com",
    "reddit.com", "tumblr.com", "discord.gg", "discord.com",
    # file and document hosts
    "dropbox.com", "drive.google.com", "docs.google.com", "mega.nz", "mediafire.com",
    "wetransfer.com", "scribd.com",
})

BLACKLISTED_EXTENSIONS = frozenset({
    "jpg", "jpeg", "png", "gif", "gifv", "bmp", "tif", "tiff", "webp", "svg", "ico", "heic",
    "mp4", "webm", "avi", "mov", "mkv", "flv", "wmv", "m4v", "mpg", "mpeg", "3gp",
    "mp3", "wav", "ogg", "flac", "m4a", "aac", "wma",
    "zip", "tar", "gz", "tgz", "bz2", "xz", "7z", "rar",
    "exe", "msi", "dmg", "apk", "iso", "bin", "deb", "rpm", "jar", "torrent", "swf",
    "pdf", "doc", "docx", "ppt", "pptx", "xls", "xlsx", "odt", "epub",
})

REASONS = ("kept", "malformed", "domain", "extension", "duplicate")
_HOST = re.compile(r"^[a-z0-9\u00a1-\uffff]([a-z0-9\u00a1-\uffff-]*[a-z0-9\u00a1-\uffff])?"
                   r"(\.[a-z0-9\u00a1-\uffff]([a-z0-9\u00a1-\uffff-]*[a-z0-9\u00a1-\uffff])?)+$")
_BAD_CHARS = re.compile(r"[\s\x00-\x1f\x7f<>\"{}|\\^`]")


def normalize_url(url: str) -> str | None:
    """Duplicate key of ``url`` (lowercase scheme/host, no fragment or trailing slash), or None
    when it is malformed."""
    if _BAD_CHARS.search(url):
        return None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError:
        return None
    host = (parts.hostname or "").rstrip(".")
    if parts.scheme.lower() not in ("http", "https") or not _HOST.match(host):
        return None
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit((parts.scheme.lower(), netloc, parts.path.rstrip("/"), parts.query, ""))


def domain_is_blacklisted(host: str, blacklist: frozenset[str]) -> bool:
    """True when ``host`` or any parent domain of it (``a.b.c`` -> ``b.c``) is in ``blacklist``."""
    labels = host.split(".")
    return any(".".join(labels[i:]) in blacklist for i in range(len(labels) - 1))


def has_blacklisted_extension(path: str) -> bool:
    """True when the last path segment ends in a blacklisted file extension."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return "." in name and name.rsplit(".", 1)[-1].lower() in BLACKLISTED_EXTENSIONS


def classify_urls(urls: Iterable[str], blacklist: frozenset[str] = DEFAULT_DOMAIN_BLACKLIST
                  ) -> Iterator[tuple[str, str]]:
    """``(url, reason)`` for each non-blank URL, reason one of ``REASONS`` (``kept`` = keep it).

    Duplicates are judged against earlier kept URLs only, so the first occurrence is kept.
    """
    seen: set[str] = set()
    for raw in urls:
        url = raw.strip()
        if not url:
            continue
        key = normalize_url(url)
        if key is None:
            yield url, "malformed"
            continue
        parts = urlsplit(key)
        if domain_is_blacklisted(parts.hostname or "", blacklist):
            yield url, "domain"
        elif has_blacklisted_extension(parts.path):
            yield url, "extension"
        elif key in seen:
            yield url, "duplicate"
        else:
            seen.add(key)
            yield url, "kept"


def read_domain_blacklist(path: str) -> frozenset[str]:
    """Domains from ``path``: one a line, ``#`` starts a comment, case-insensitive."""
    require_file(path, "--domain-blacklist")
    with open(path, encoding="utf-8") as handle:
        lines = (line.split("#", 1)[0].strip().lower().rstrip(".") for line in handle)
        return frozenset(line for line in lines if line)


def filter_url_file(input_path: str, output_path: str, rejected_path: str | None = None,
                    extra_blacklist: str | None = None) -> dict[str, int]:
    """Write the kept URLs of ``input_path`` to ``output_path``; returns counts per reason."""
    require_file(input_path, "--input")
    blacklist = DEFAULT_DOMAIN_BLACKLIST
    if extra_blacklist is not None:
        blacklist = blacklist | read_domain_blacklist(extra_blacklist)
    counts = dict.fromkeys(REASONS, 0)
    with open(input_path, encoding="utf-8", errors="replace") as source, \
            atomic_outputs(output_path, rejected_path) as (kept, rejected):
        for url, reason in classify_urls(source, blacklist):
            counts[reason] += 1
            if reason == "kept":
                kept.write(url + "\n")
            elif rejected is not None:
                rejected.write(f"{url}\t{reason}\n")
    return counts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="text file, one URL a line")
    parser.add_argument("--output", required=True, help="kept URLs, one a line")
    parser.add_argument("--domain-blacklist", default=None,
                        help="extra domains to drop, one a line (added to the built-in list)")
    parser.add_argument("--rejected", default=None, help="write dropped URLs as url<TAB>reason")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = filter_url_file(args.input, args.output, args.rejected, args.domain_blacklist)
    print(f"{sum(counts.values())} URLs: {format_counts(counts)}")
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
