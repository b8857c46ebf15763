"""Abstraction profiles: how abstract each feature of an SAE is, measured against a label hierarchy.

Modules: levels (the hierarchy, each feature's level), profile (an index's features placed, a model's profile and
the table putting models side by side), layout (abstraction.parquet and .json in the index folder, their read side:
light, the service reads it), run (`actstore abstraction`: AbstractionConfig, run_abstraction).
"""

from services.abstraction.layout import Abstraction, level_line, read_abstraction
from services.abstraction.levels import Hierarchy, Levels, feature_levels
from services.abstraction.profile import column_nodes, depth_counts, image_nodes, index_levels, profile, profile_table
from services.abstraction.run import AbstractionConfig, run_abstraction

__all__ = ["Abstraction", "AbstractionConfig", "Hierarchy", "Levels", "column_nodes", "depth_counts",
           "feature_levels", "image_nodes", "index_levels", "level_line", "profile", "profile_table",
           "read_abstraction", "run_abstraction"]
