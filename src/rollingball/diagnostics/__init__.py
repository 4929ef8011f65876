"""Tools that measure what an optimizer step costs; the optimizer itself never imports them."""
