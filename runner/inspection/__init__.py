"""Crack maps of whole photos: the windows a photo is cut into (windows), the map they give and its score (crack_map)."""
