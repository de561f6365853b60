# ncu details (speed of light, warp states, pipe utilisation) of the attention and knorm
# kernels for one 2-layer call at 32K; run on the GPU machine from the repository root.
export LD_LIBRARY_PATH=$PWD/build-cuda/dist/lib
D=build-cuda/dist
timeout 300 ncu --clock-control none -k regex:"WindowStats|ColumnSum|Knorm" -c 3 \
  --section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis --section Occupancy --section LaunchStats \
  --metrics sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active,smsp__issue_active.avg.pct_of_peak_sustained_active,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum,smsp__inst_executed.sum,sm__inst_executed_pipe_tensor_op_hmma.sum \
  $D/gpu_bench --tokens=32768 --layers=2 --methods=snapkv,knorm --repeats=1 > $OUT/ncu_detail.log 2>&1
echo "ncu exit $?"
grep -E "WindowStats|ColumnSum|Knorm|Duration|Throughput|hmma|pipe_xu|issue_active|bank_conflicts|Achieved Occupancy|Theoretical Occupancy|Registers Per|Stall|inst_executed|Block Limit|Warp Cycles Per Issued" $OUT/ncu_detail.log | head -150
