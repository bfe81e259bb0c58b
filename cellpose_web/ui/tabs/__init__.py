"""One module per tab of the app; a tab never imports another tab (import contract)."""
