"""The app layer beside the core: charts (plotly) and display helpers. bcc_core imports neither streamlit nor plotly."""
