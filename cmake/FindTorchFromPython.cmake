# Finds Torch through the Python interpreter that runs the build: torch.utils.cmake_prefix_path.
find_package(Python3 REQUIRED COMPONENTS Interpreter)
execute_process(
  COMMAND "${Python3_EXECUTABLE}" -c "import torch.utils; print(torch.utils.cmake_prefix_path)"
  OUTPUT_VARIABLE FUSEDRL_TORCH_PREFIX OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _torch_found)
if(NOT _torch_found EQUAL 0)
  message(FATAL_ERROR "fusedrl: torch is not importable by ${Python3_EXECUTABLE}; install torch first "
                      "and build with `pip install --no-build-isolation .`")
endif()
execute_process(
  COMMAND "${Python3_EXECUTABLE}" -c "import torch; print(torch.version.cuda or '')"
  OUTPUT_VARIABLE FUSEDRL_TORCH_CUDA_VERSION OUTPUT_STRIP_TRAILING_WHITESPACE)
list(APPEND CMAKE_PREFIX_PATH "${FUSEDRL_TORCH_PREFIX}")
