"""Base-model building, staging and verified loading."""
