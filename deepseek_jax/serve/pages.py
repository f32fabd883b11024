"""Pages of the latent cache, on the host: who owns which page, and automatic prefix caching.

A page holds `page_size` consecutive tokens of one sequence. A page that is full of prompt tokens is published
under a hash of its tokens and of every token before it (the chain of parent hashes, as vLLM's automatic prefix
caching keys its blocks), so a later prompt with the same prefix maps those pages into its table instead of
computing them again. Pages are reference-counted; a published page nobody uses stays cached, and is evicted
least recently used first when a new page is needed. Page ids run 0..num_pages-1; `num_pages` itself is the
table's "no page".
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence


def page_hashes(tokens: Sequence[int], page_size: int) -> list[bytes]:
    """The chained key of every full page of tokens: h_i = H(h_{i-1}, tokens of page i)."""
    out, parent = [], b""
    for start in range(0, len(tokens) - page_size + 1, page_size):
        parent = hashlib.blake2b(parent + repr(tuple(tokens[start:start + page_size])).encode(),
                                 digest_size=16).digest()
        out.append(parent)
    return out


class PagePool:
    """num_pages pages of page_size tokens. Not thread-safe: the engine's loop is its only user."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"need num_pages >= 1 and page_size >= 1, got {num_pages} and {page_size}")
        self.num_pages, self.page_size = num_pages, page_size
        self.refs = [0] * num_pages
        self.free: collections.deque[int] = collections.deque(range(num_pages))  # never published, unused
        self.cached: collections.OrderedDict[int, None] = collections.OrderedDict()  # published, unused: LRU first
        self.by_hash: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}
        self.hits = self.queries = 0  # prefix-cache pages found / looked up

    @property
    def available(self) -> int:
        """Pages a new allocation can take (free, or cached and evictable)."""
        return len(self.free) + len(self.cached)

    @property
    def used(self) -> int:
        """Pages some sequence holds."""
        return self.num_pages - self.available

    def match(self, tokens: Sequence[int]) -> list[int]:
        """The cached pages of tokens' longest cached prefix of full pages, now held by the caller. The last token
        is never matched: its logits must be computed."""
        pages = []
        for h in page_hashes(tokens[:len(tokens) - 1], self.page_size):
            self.queries += 1
            page = self.by_hash.get(h)
            if page is None:
                break
            self.hits += 1
            pages.append(page)
        for page in pages:
            self._hold(page)
        return pages

    def allocate(self, n: int) -> list[int] | None:
        """n pages, evicting cached ones least recently used first; None (and nothing taken) if there are not n."""
        if n > self.available:
            return None
        out = []
        for _ in range(n):
            if self.free:
                page = self.free.popleft()
            else:
                page, _ = self.cached.popitem(last=False)
                del self.by_hash[self.hash_of.pop(page)]
            self.refs[page] = 1
            out.append(page)
        return out

    def publish(self, page: int, key: bytes) -> None:
        """Offer a held, full page under its chained hash (a no-op if that prefix is cached already)."""
        if key not in self.by_hash and page not in self.hash_of:
            self.by_hash[key], self.hash_of[page] = page, key

    def release(self, pages: Sequence[int]) -> None:
        """Drop one reference to each page; unused pages become free, or stay cached if published."""
        for page in pages:
            if self.refs[page] < 1:
                raise RuntimeError(f"page {page} released more often than it was taken")
            self.refs[page] -= 1
            if self.refs[page] == 0:
                if page in self.hash_of:
                    self.cached[page] = None
                else:
                    self.free.append(page)

    def _hold(self, page: int) -> None:
        if self.refs[page] == 0:
            del self.cached[page]
        self.refs[page] += 1
