"""What the trainer and the planner both need: the recipe schema and loader, its errors, and the
bundled model configs. Imports nothing of bytetune above the kernels' floor."""

from bytetune.recipe.bundled import MODEL_CONFIGS_DIR, bundled_model_config, shrink_model_config
from bytetune.recipe.schema import (
    DEFAULT_RECIPE,
    PYPI_PREFIX,
    RECIPES_DIR,
    RecipeConfig,
    RecipeError,
    available_recipes,
    check_data_paths,
    check_local_paths,
    check_model_paths,
    check_pipeline_layout,
    installed_package_dir,
    is_local_path,
    lkd_device,
    load_recipe,
    load_yaml,
    merge_checked,
    overrides_config,
    parse_overrides,
    pipeline_stages_per_rank,
    pypi_package_dir,
    recipe_path,
    sections_help,
    to_yaml,
    torch_dtype,
    validate,
)

__all__ = [
    "MODEL_CONFIGS_DIR", "bundled_model_config", "shrink_model_config",
    "RECIPES_DIR", "RecipeConfig", "RecipeError", "available_recipes", "load_recipe", "load_yaml",
    "merge_checked", "overrides_config", "parse_overrides", "recipe_path", "sections_help", "to_yaml",
    "torch_dtype", "validate", "check_data_paths", "check_local_paths", "check_model_paths",
    "check_pipeline_layout", "pipeline_stages_per_rank",
    "DEFAULT_RECIPE", "PYPI_PREFIX", "installed_package_dir", "is_local_path", "lkd_device", "pypi_package_dir",
]
