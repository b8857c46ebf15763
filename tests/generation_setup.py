"""The generation head's test setup (services.steer.setup.build_generation), under the names the tests use."""

from services.steer.setup import Generation, build_generation, random_sae as sae_on

__all__ = ["Generation", "build_generation", "sae_on"]
