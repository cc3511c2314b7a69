"""Generated demo data (coloured-shape scenes) and the tiny CLIP demo model in ``model/``."""
