"""Views: data in, figures and HTML out (plotly figures, the HTML report, run tables, the synthetic run, the causal
views). Nothing here loads a model."""
