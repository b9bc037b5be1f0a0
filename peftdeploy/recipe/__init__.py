"""Recipe: the declarative YAML a team writes (schema) and its loader (positions, extends, env)."""
from .loader import LoadedRecipe, RecipeErrors, is_local_path, load_recipe
from .schema import API_VERSION, Adapter, Backbone, Policy, Quantization, Recipe, Secret, Serving, json_schema

__all__ = [
    "API_VERSION", "Adapter", "Backbone", "LoadedRecipe", "Policy", "Quantization", "Recipe",
    "RecipeErrors", "Secret", "Serving", "is_local_path", "json_schema", "load_recipe",
]
