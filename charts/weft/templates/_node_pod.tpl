{{/*
The node agent's pod: its spec, and the labels and annotations of its template.
node.yaml names the DaemonSet after a hash of it, so that a change makes a new
DaemonSet (see there).
*/}}
{{- define "weft.nodePodSpec" -}}
{{- $n := .Values.node }}
      serviceAccountName: weft-node
      # Read-only access to this release's node DaemonSets (rbac.yaml): the agent
      # tells an uninstall (none left) from an upgrade or a restart.
      automountServiceAccountToken: true
      # A stopping agent serves until its successor is ready, then lets the
      # connections it holds end (docs/kubernetes.md, "Upgrades").
      terminationGracePeriodSeconds: {{ add $n.upgrade.successorWaitSeconds $n.upgrade.drainSeconds 15 }}
      hostNetwork: true
      hostPID: true
      dnsPolicy: ClusterFirstWithHostNet
      {{- with $n.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      initContainers:
        # Copies weft-cni to the host and chains it after the cluster's network plugin.
        - name: install-cni
          image: {{ include "weft.image" (dict "image" $n.image "appVersion" .Chart.AppVersion) }}
          imagePullPolicy: {{ $n.image.pullPolicy }}
          command: [weft-cni, install]
          args:
            - --bin-dir=/host/opt/cni/bin
            - --conf-dir=/host/etc/cni/net.d
            - --socket=/var/run/weft/cni.sock
            - --wait-seconds={{ $n.cniWaitSeconds }}
          securityContext:
            runAsUser: 0
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities:
              drop: [ALL]
              add: [DAC_OVERRIDE, CHOWN, FOWNER]
          volumeMounts:
            - {name: cni-bin, mountPath: /host/opt/cni/bin}
            - {name: cni-conf, mountPath: /host/etc/cni/net.d}
      containers:
        - name: node
          image: {{ include "weft.image" (dict "image" $n.image "appVersion" .Chart.AppVersion) }}
          imagePullPolicy: {{ $n.image.pullPolicy }}
          args:
            - run
            - --capture
            - --control-plane=https://{{ include "weft.cpHost" . }}:15012
            - --server-name={{ include "weft.cpHost" . }}
            - --credential-dir=/var/run/secrets/weft
            - --token-file=/var/run/secrets/weft/token
            {{- with $n.captureCgroup }}
            - --cgroup={{ . }}
            {{- end }}
            - --bpf-dir={{ $n.bpffs }}/weft
            - --cni-socket=/var/run/weft/cni.sock
            - --state-dir=/var/run/weft
            - --lb={{ $n.loadBalancing }}
            - --http1-head-timeout={{ $n.http1HeadTimeout }}
            - --http-idle-timeout={{ $n.httpIdleTimeout }}
            - --hbone-handshake-timeout={{ $n.hboneHandshakeTimeout }}
            - --max-handshakes-per-source={{ $n.maxHandshakesPerSource }}
            - --hbone-server-idle-timeout={{ $n.hboneServerIdleTimeout }}
            - --allow-from-node={{ $n.allowFromNode }}
            {{- if $n.workloadApi }}
            - --workload-api-socket=spiffe/socket
            {{- end }}
            - --admin-addr=127.0.0.1:15000
            - --metrics-addr=0.0.0.0:15020
            - --successor-wait={{ $n.upgrade.successorWaitSeconds }}s
            - --drain-timeout={{ $n.upgrade.drainSeconds }}s
            - --release-daemonsets=app.kubernetes.io/instance={{ .Release.Name }},app.kubernetes.io/component=node
            - --cni-bin-dir=/host/opt/cni/bin
            - --cni-conf-dir=/host/etc/cni/net.d
          env:
            - name: WEFT_NODE_NAME
              valueFrom:
                fieldRef: {fieldPath: spec.nodeName}
            - name: POD_NAMESPACE
              valueFrom:
                fieldRef: {fieldPath: metadata.namespace}
            - name: WEFT_LOG_FORMAT
              value: {{ .Values.logFormat | quote }}
          # No `ports`: with hostNetwork they would be host ports, and a successor agent
          # could not be scheduled on the node while its predecessor drains.
          readinessProbe:
            httpGet: {path: /healthz/ready, port: 15020}
            periodSeconds: 5
          livenessProbe:
            tcpSocket: {port: 15020}
            initialDelaySeconds: 10
            periodSeconds: 10
          resources:
            {{- toYaml $n.resources | nindent 12 }}
          securityContext:
            runAsUser: 0
            readOnlyRootFilesystem: true
            {{- if $n.privileged }}
            privileged: true
            {{- else }}
            privileged: false
            allowPrivilegeEscalation: false
            capabilities:
              drop: [ALL]
              # BPF + PERFMON: load the eBPF programs; NET_ADMIN: attach them, set
              # socket marks and listeners in pods' netns; SYS_ADMIN: enter pods'
              # network namespaces (setns) and attach cgroup programs; SYS_PTRACE:
              # read other processes' namespace links under /proc; NET_RAW: raw
              # sockets for the transparent listeners.
              add: [BPF, PERFMON, NET_ADMIN, SYS_ADMIN, SYS_PTRACE, NET_RAW]
            {{- end }}
          volumeMounts:
            - {name: credentials, mountPath: /var/run/secrets/weft, readOnly: true}
            - {name: run, mountPath: /var/run/weft}
            - {name: bpffs, mountPath: {{ $n.bpffs }}, mountPropagation: HostToContainer}
            - {name: cgroup, mountPath: {{ $n.cgroupRoot }}, readOnly: true}
            - {name: netns, mountPath: /var/run/netns, mountPropagation: HostToContainer}
            # For the uninstall: weft-cni is taken out of the chain.
            - {name: cni-bin, mountPath: /host/opt/cni/bin}
            - {name: cni-conf, mountPath: /host/etc/cni/net.d}
      volumes:
        - name: credentials
          projected:
            sources:
              - serviceAccountToken:
                  audience: {{ .Values.controlPlane.tokenAudience }}
                  expirationSeconds: 3600
                  path: token
              - configMap:
                  name: weft-ca-root-cert
                  items:
                    - {key: root-cert.pem, path: ca.crt}
        - name: run
          hostPath: {path: /var/run/weft, type: DirectoryOrCreate}
        - name: bpffs
          hostPath: {path: {{ $n.bpffs }}, type: Directory}
        - name: cgroup
          hostPath: {path: {{ $n.cgroupRoot }}, type: Directory}
        - name: netns
          hostPath: {path: /var/run/netns, type: DirectoryOrCreate}
        - name: cni-bin
          hostPath: {path: {{ $n.cniBinDir }}, type: DirectoryOrCreate}
        - name: cni-conf
          hostPath: {path: {{ $n.cniConfDir }}, type: DirectoryOrCreate}
      {{- with $n.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $n.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end -}}
