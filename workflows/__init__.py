"""nipype workflow factories (``init_<name>_wf``), one file per workflow."""
