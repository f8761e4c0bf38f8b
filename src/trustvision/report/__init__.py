"""Self-contained HTML reports of audit results, and figure helpers."""

from trustvision.report.figures import figure_to_png, png_data_uri, save_figure
from trustvision.report.html import (
    check_sections,
    load_results,
    render_html,
    render_report,
    summary_csv,
    summary_html,
    summary_table,
)

__all__ = [
    "render_report", "render_html", "load_results", "summary_table", "summary_csv", "summary_html", "check_sections", "figure_to_png", "png_data_uri", "save_figure",
]
