"""Data on disk: dataset formats and their readers (readers), and the decoded-image cache (decode_cache)."""
