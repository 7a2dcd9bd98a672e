"""bcc_core: blood-cell classification core (data, models, training, trust, screening).

Decision support for a second reader, never a diagnosis. This package never imports Streamlit.
"""

__version__ = "0.1.0"
