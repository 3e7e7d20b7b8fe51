"""The output directory: work area, journal, commit, manifest, verify, card and inspect."""
