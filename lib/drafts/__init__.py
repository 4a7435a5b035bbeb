"""Draft families. Each registers a DraftStrategy; eagle3/ is the first."""
