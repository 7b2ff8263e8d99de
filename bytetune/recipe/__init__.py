"""What the trainer and the planner both need: the recipe schema and loader, its errors, and the
bundled model configs. Imports nothing of bytetune above the kernels' floor."""

from bytetune.recipe.bundled import MODEL_CONFIGS_DIR, bundled_model_config, shrink_model_config
from bytetune.recipe.schema import (
    RECIPES_DIR,
    RecipeConfig,
    RecipeError,
    available_recipes,
    load_recipe,
    parse_overrides,
    recipe_path,
    to_yaml,
    torch_dtype,
    validate,
    merge_checked,
    load_yaml,
    overrides_config,
    check_data_paths,
    check_local_paths,
    check_model_paths,
    sections_help,
)

__all__ = [
    "MODEL_CONFIGS_DIR", "bundled_model_config", "shrink_model_config",
    "RECIPES_DIR", "RecipeConfig", "RecipeError", "available_recipes", "load_recipe",
    "parse_overrides", "recipe_path", "to_yaml", "torch_dtype", "validate", "check_data_paths", "check_local_paths", "check_model_paths",
    "sections_help", "merge_checked", "load_yaml", "overrides_config",
]
