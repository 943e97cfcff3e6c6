"""Transcriptions of official implementations, used only as references in tests."""
