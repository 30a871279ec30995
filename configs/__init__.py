"""Experiment configs: one `get_config(arg)` file per task; helpers in `configs.common`.

Task files import `from configs import common` (works whether `configs` resolves as this
package or, under an editable install made before this file existed, as a namespace).
"""
