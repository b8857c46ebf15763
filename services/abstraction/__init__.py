"""Abstraction profiles: how abstract each feature of an SAE is, measured against a label hierarchy."""

from services.abstraction.levels import Hierarchy, Levels, feature_levels
from services.abstraction.profile import depth_counts, image_nodes, index_levels

__all__ = ["Hierarchy", "Levels", "depth_counts", "feature_levels", "image_nodes", "index_levels"]
