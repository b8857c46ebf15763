"""Abstraction profiles: how abstract each feature of an SAE is, measured against a label hierarchy."""

from services.abstraction.levels import Hierarchy, Levels, feature_levels

__all__ = ["Hierarchy", "Levels", "feature_levels"]
