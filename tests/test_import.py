import subprocess
import sys


def test_import_is_light():
    """`import pipeline` must not pull torch, transformers or a runtime (fast CLI, no TensorRT needed)."""
    code = ("import sys, pipeline; from pipeline import Pipeline; "
            "heavy = [m for m in ('torch', 'transformers', 'onnxruntime', 'onnx', 'tensorrt') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
